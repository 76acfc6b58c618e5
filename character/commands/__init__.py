"""The commands of the `character` command line (character.cli assembles them), one module per group.

Each command checks its flags with light imports only and imports torch, transformers, tinker or Prefect
inside its body, after that: bad input fails in well under a second.
"""
