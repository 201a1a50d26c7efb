"""Stage 2: train one backbone under the Attract-and-Repulse recipe with HuggingFace Accelerate."""
