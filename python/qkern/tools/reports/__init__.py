"""Accuracy reports on real models: each module has ``run(...) -> str`` returning a Markdown
table (float vs quantized), printed by ``make demo`` and copied into the README."""
