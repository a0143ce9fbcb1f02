"""The models of hlss_hf, one folder each; a folder's files are the remote code its saved models carry."""
