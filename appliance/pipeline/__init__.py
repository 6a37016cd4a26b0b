"""The image pipeline: thumbnails, previews and image events off the association path;
study completeness."""
