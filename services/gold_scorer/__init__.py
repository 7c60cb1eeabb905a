"""Gold-RM scorer: p_gold and p_best for each pair, with model versions."""
