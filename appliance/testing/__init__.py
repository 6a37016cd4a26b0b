"""Everything that pretends to be a peer: a simulated unit, synthetic images, the relay emulator,
the cloud's side and the demo (as `trio.testing`). Production code never imports this package."""
