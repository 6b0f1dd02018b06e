"""The code behind `devmodel.testing`; import it from there, never from here."""
