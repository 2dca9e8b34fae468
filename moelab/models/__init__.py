"""Model families, one module each: Config parsed from config.json, init_params, forward."""
