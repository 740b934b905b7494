"""What every layer shares and nothing imports back: the errors the CLI reports, and the control vocabulary."""
