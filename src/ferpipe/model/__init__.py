"""The networks (networks) and how a trained one is run on faces (infer: crops, test-time
views, batched prediction). Imports only the base modules of ferpipe."""
