from airflow_modelopt.container.cli import main

raise SystemExit(main())
