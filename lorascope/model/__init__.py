"""What a model is made of: parameter taxonomy, LoRA parameter counts, PEFT configs."""
