"""Parts of `fhirsynth demo` (fhirsynth/commands/demo.py): the holdout split, the benchmark results it quotes, and
the plain-words explanation of its numbers."""
