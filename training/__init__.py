"""Training package: data engine, Stage-1 / Stage-2 trainers, evaluation."""
