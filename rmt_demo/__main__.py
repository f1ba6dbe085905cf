"""`python -m rmt_demo`: run the demo (`rmt_demo.demo.main`)."""

from rmt_demo.demo import main

if __name__ == "__main__":
    main()
