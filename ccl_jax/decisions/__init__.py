"""Groups of training images, routing of new images to a group, and class-wise thresholds
from the scores of unseen normal images: pure functions, no model."""
