"""Datasets (Karpathy JSON, tfds coco_captions, demo, synthetic) and the feature cache."""
