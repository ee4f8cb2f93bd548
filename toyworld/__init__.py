"""The toy world: a procedural 3D world with known answers, its trained toy prior and toy CLIP, and scoring."""
