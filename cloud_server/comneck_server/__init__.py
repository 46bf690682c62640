"""ComNeck cloud gateway: bitstream -> y_hat -> neck -> CLIP tail -> backend."""
