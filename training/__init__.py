"""Bradley-Terry reward-model training and the Kubernetes Job launcher."""
