"""stalwart.model.gpt."""
