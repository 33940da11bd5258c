"""CCL / RD: the losses and the second view of the CCL paper (Sec. 3), the jitted training
step, and the detector that scores images with a trained network."""
