"""loctune: geometry-aware supervision of location tokens for VLM fine-tuning."""
