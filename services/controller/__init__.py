"""The two-stage curation loop: durable state, providers, simulated judges, the controller."""
