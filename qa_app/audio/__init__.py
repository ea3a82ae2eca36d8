"""Audio in, endpointing, speech synthesis for training data, and the ASR baseline."""
