"""One module per pipeline stage; each reads the previous stage's output and writes its own."""
