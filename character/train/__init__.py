"""Training: the chat renderer, the one loop, losses, DPO and SFT."""
