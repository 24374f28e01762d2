from airflow_modelopt.cli import main

raise SystemExit(main())
