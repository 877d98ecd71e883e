"""Memory tiers: working, episodic, semantic and model performance."""
