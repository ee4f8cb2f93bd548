"""Small shared helpers: seeding, atomic writes, losses, image and video output."""
