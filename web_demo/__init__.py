"""The browser demo: a text box with a phone keyboard's suggestion strip, driven by the
aggregator's latest global model (`python -m web_demo`, or `fedkb demo`)."""
