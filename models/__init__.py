"""signserve's shared core: architectures, preprocessing, checkpoint format, class names and CNN math."""
