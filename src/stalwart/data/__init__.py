"""stalwart.data.loader."""
