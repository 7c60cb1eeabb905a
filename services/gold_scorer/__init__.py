"""Gold-RM scorer: the first stage of the chain; p_gold and p_best (Stage 1: the working RM's p) per pair."""
