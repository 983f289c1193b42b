"""Selection on out-of-fold maps: configurations, scoring, search, applying a recipe, export."""
