"""Training methods: AECR-Net (CR), CUT / FastCUT / SinCUT, CycleGAN."""
