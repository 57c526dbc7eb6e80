"""Importers: published reinforcements (apple/ml-dr's ImageNet+, ml-mobileclip's DataCompDR)
joined with the user's images and written in fastload's reinforced format (``fastload.format``).
Foreign pickles are read only through an allow-list; every size is bounded before allocating."""
