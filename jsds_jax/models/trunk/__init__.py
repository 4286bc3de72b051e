"""The frozen trunk: pretrained towers (ViT, BERT, CLIP, EfficientNet-Lite, BLIP, ALBEF), their
weight loaders and converters. Nothing here is trained; `encode` runs it once per dataset."""
