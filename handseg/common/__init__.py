"""Constants, errors, notices and the torchrun process group: what every stage shares."""
