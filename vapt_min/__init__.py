"""vapt_min: visual prompt tuning methods on a frozen ViT, small enough to read in one sitting."""
