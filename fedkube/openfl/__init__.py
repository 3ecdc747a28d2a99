"""OpenFL 1.6 interactive-API experiments: their archives read without running any of
the owner's code (pickles inspected, never loaded), and what their plan asks of the
aggregator."""
