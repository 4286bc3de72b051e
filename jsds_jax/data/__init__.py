"""Datasets (Karpathy JSON, tfds coco_captions, demo, corpus, synthetic) and the feature cache."""
