"""The curator's review web application (``diffcolor review``): above the flows, since it starts them."""
