"""What every part of ESA shares and no experiment owns: errors, named registries, strict schemas, hashing,
provenance, progress output and result files."""
