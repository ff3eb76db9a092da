"""Level 4: a compressed model on its way out — folded and laid out for inference, saved and loaded
(safetensors, Hugging Face directories), merged back to dense layers."""
