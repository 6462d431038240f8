"""privrec on Flower: the ClientApp and ServerApp of the book's federated recommender."""
