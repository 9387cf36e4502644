"""Building blocks the model files share: attention, norms, rotary embeddings, activations."""
