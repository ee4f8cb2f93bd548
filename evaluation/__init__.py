"""Everything that measures a run: CLIP similarity (paper protocol), the OOD probe's matching loss, the training
monitor, the A/B report and the figures."""

# key of the mean matching loss (Eq. 5) in evaluation reports and batch rows
MATCHING = "matching_loss"
