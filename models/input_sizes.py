"""The square input side each architecture trains and serves at unless told otherwise (torch-free, so
the calculators' command line can read it without importing torch). Each checkpoint stores its own."""

# resnet18's stem divides the side by 4 before the first residual stage: 80 leaves 20x20 feature maps.
DEFAULT_INPUT_SIZE = {"cnn": 32, "resnet18": 80}
