"""The error of an input that cannot be made an image, apart so that images.py and urls.py both import it."""


class ImageError(ValueError):
    """An input could not be turned into an image; the message names the input."""
