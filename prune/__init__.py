"""headprune's acting side: mask or remove heads, repair, evaluate, export, run recipes, the CLI."""
