"""The learning loop: activity capture, QA reviews, feedback, prompt and routing versions."""
