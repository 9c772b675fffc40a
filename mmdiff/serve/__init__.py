"""`mmdiff serve`: a Gradio web demo of one saved pipeline folder (see `app.build_app` and `handlers`)."""
