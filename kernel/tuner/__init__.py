"""The built-in fine-tuner: from traces and outcomes to data sets (and, later, to LoRA adapters)."""
