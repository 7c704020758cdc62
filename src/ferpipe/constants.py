"""What every part of the pipeline agrees on: the seven classes, the face size, and the
usages a face can come from (FER2013's Usage column, plus faces that come without a label)."""

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(EMOTIONS)
IMAGE_SIZE = 48
USAGES = ("Training", "PublicTest", "PrivateTest", "Unlabelled")
UNLABELLED = -1  # the label of a face that has none (the course's test.csv)
